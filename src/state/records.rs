//! The on-disk records: a cache's settings, its current generation, and each volume. Serialised
//! as JSON and always written temp → fsync → rename (see `fsutil::write_json_atomic`).
//! References between them (which layers are in use) are derived by reading these records, never
//! kept as counters a crash could corrupt.

use crate::input::names::CacheId;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How a cache's volumes are made; fixed when the cache is created.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// Immutable ext4 layers under an overlay with a per-volume upper; many concurrent jobs
    /// share the layers' page cache; per-file last writer wins.
    #[default]
    Overlay,
    /// One ext4 image per generation; a volume is a copy-on-write clone of it mounted directly
    /// (container storage, user-namespaced pods); one writer at a time by default.
    Clone,
}

impl CacheMode {
    /// The user-facing name (`overlay`, `clone`).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Overlay => "overlay",
            CacheMode::Clone => "clone",
        }
    }

    /// Parses a user's value; `what` names where it came from in the error.
    pub fn parse(what: &str, value: &str) -> crate::error::Result<Self> {
        match value {
            "overlay" => Ok(CacheMode::Overlay),
            "clone" => Ok(CacheMode::Clone),
            other => Err(crate::error::Error::invalid(format!(
                "{what} {other:?} is not a cache mode: use \"overlay\" (layers shared by many jobs) or \"clone\" (container storage, one writer at a time)"
            ))),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `caches/<ns>/<name>/cache.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheRecord {
    /// Which cache.
    pub id: CacheId,
    /// Limit on the allocated bytes of all current layers.
    pub cache_size: u64,
    /// How its volumes are made (records written before modes existed are overlay caches).
    #[serde(default)]
    pub mode: CacheMode,
    /// The cache's GID (unique in the cluster), once a volume with unique ids used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Unix seconds.
    pub created: u64,
}

/// One committed layer of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerInfo {
    /// File stem under `layers/`.
    pub id: String,
    /// Unix seconds when it was committed.
    pub created: u64,
    /// Where it came from: the volume DIR it was committed from, or `squash`/`import`.
    pub source: String,
    /// Apparent size of the image (its filesystem size).
    pub size: u64,
    /// Bytes the image occupies on the host.
    pub allocated: u64,
    /// For a squashed base: the ids of every layer whose content it holds (transitively). Registry
    /// sync uses it to tell a base that merely folds layers the registry already has from new
    /// content. Empty for a commit's delta layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<String>,
    /// For a metadata base (`cache squash --metadata`): the layers its files' data lives in,
    /// mounted as overlayfs data-only layers below it, newest first (each file is a sparse stub
    /// whose redirect names its own path; the first data layer holding a regular file there is
    /// the one the merged view took it from). Empty for every other layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
    /// For a metadata base: what its data layers hold (zero for every other layer).
    #[serde(default, skip_serializing_if = "DataUsage::is_zero")]
    pub data_usage: DataUsage,
}

/// The bytes of a metadata base's data layers: all they allocate, and what of it the files the
/// base shows allocate (the rest is shadowed: bytes of files later layers replaced or deleted,
/// which only a full squash gives back).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataUsage {
    /// Allocated bytes of the data layers' images.
    pub allocated: u64,
    /// Allocated bytes of the files the base's stubs reference.
    pub live: u64,
}

impl DataUsage {
    fn is_zero(&self) -> bool {
        *self == DataUsage::default()
    }

    /// Bytes the data layers hold that no file of the base shows.
    pub fn shadowed(&self) -> u64 {
        self.allocated.saturating_sub(self.live)
    }

    /// Whether the data layers hold more shadowed bytes (files that later layers replaced or
    /// deleted, which every metadata squash keeps) than live ones, and more than
    /// [`DataUsage::SHADOWED_FLOOR`]: then the next squash is a full one, which copies only the
    /// live files.
    pub fn too_shadowed(&self) -> bool {
        self.shadowed() > self.live.max(Self::SHADOWED_FLOOR)
    }

    /// Shadowed bytes the data layers may hold before a full squash is due, whatever their
    /// share: below this a full squash gives back too little to be worth its copy.
    pub const SHADOWED_FLOOR: u64 = 64 << 20;
}

impl LayerInfo {
    /// This layer's id and every id it covers.
    pub fn known_ids(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.id).chain(self.covers.iter())
    }
}

/// What produced a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Provenance {
    /// `commit`, `squash`, `import`, `rollback` or `resize`.
    pub kind: String,
    /// For a person: the volume DIR of a commit, `generation N` of a squash or rollback, the
    /// image reference of an import.
    pub source: String,
    /// Everything else known: the PVC's namespace, name and UID, the PV and the node of a
    /// commit made through the hook; an import's digest; a resize's sizes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub details: std::collections::BTreeMap<String, String>,
}

impl Provenance {
    /// A provenance of `kind` from `source`.
    pub fn new(kind: &str, source: impl Into<String>) -> Self {
        Provenance {
            kind: kind.to_string(),
            source: source.into(),
            details: Default::default(),
        }
    }

    /// Adds a detail.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// `caches/<ns>/<name>/current.json`: the current generation (and, copied at publish time,
/// `history/<generation>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Generation {
    /// Increases by one with each publish.
    pub generation: u64,
    /// Bottom (base) first.
    pub layers: Vec<LayerInfo>,
    /// Unix seconds of the publish.
    pub published: u64,
    /// What produced it (generations published before provenance was recorded have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Layer ids a rollback undid (here or on another node, learnt through the registry):
    /// carried forward by every later publish, so that registry sync never merges them back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<String>,
}

impl Generation {
    /// Allocated bytes of its layers, a metadata base's data layers included.
    pub fn allocated(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.allocated + l.data_usage.allocated)
            .sum()
    }

    /// Allocated bytes of the layers above the base.
    pub fn delta_allocated(&self) -> u64 {
        self.layers.iter().skip(1).map(|l| l.allocated).sum()
    }

    /// Layer ids, bottom first.
    pub fn layer_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.id.clone()).collect()
    }

    /// The data-only layers below a metadata base, newest first (empty without one). Only a
    /// generation's base may be a metadata base.
    pub fn data_ids(&self) -> Vec<String> {
        self.layers
            .first()
            .map(|l| l.data.clone())
            .unwrap_or_default()
    }
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Record written, mounts being made. A crash here is rolled back by `gc` or a retried create.
    Creating,
    /// Mounted at DIR and in use.
    Ready,
    /// Overlay unmounted or being unmounted; a retried delete or `gc` finishes it.
    Deleting,
}

/// Owner and mode of a volume's root.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootOwner {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

/// A volume's identity: the user a job switches to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// Unique among the node's live volumes.
    pub uid: u32,
    /// The cache's GID (unique in the cluster); for a volume without a cache, its own group.
    pub gid: u32,
}

/// What a volume is made of.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeKind {
    /// An overlay of the cache's layers under its own upper image.
    #[default]
    Overlay,
    /// A copy-on-write clone of a clone cache's image, mounted at DIR directly.
    Clone,
}

/// `volumes/<id>/volume.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Volume id (hash of DIR).
    pub id: String,
    /// What it is made of.
    #[serde(default)]
    pub kind: VolumeKind,
    /// A clone volume that holds its cache's write lease (only it may commit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease: bool,
    /// The volume's own identity (`--unique-ids`): a UID unique among this node's live
    /// volumes and its cache's GID; the volume's root is owned by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// Why this volume will not commit although it was created write-back (the lease was held
    /// by another volume), told at create and at delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The canonical volume DIR.
    pub dir: PathBuf,
    /// The cache it reads from; `None` for a plain size-limited volume.
    pub cache: Option<CacheId>,
    /// The generation it was created on.
    pub generation: u64,
    /// That generation's layer ids, bottom first: these stay on disk while the volume lives.
    pub layers: Vec<String>,
    /// Size of its writable image.
    pub size: u64,
    /// Whether delete commits it.
    pub write_back: bool,
    /// Owner and mode of the root, when asked for.
    pub root: Option<RootOwner>,
    /// Unix seconds.
    pub created: u64,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Set once delete decided: discard instead of commit.
    #[serde(default)]
    pub discard: bool,
    /// Set when delete found nothing changed in a write-back volume (nothing to publish).
    #[serde(default)]
    pub unchanged: bool,
    /// Set when delete unmounted the image cleanly: only such an image may be committed.
    #[serde(default)]
    pub clean: bool,
    /// The layer id this volume's image is committed as (chosen before the rename, so a retried
    /// delete finishes the same commit instead of making a second one).
    #[serde(default)]
    pub commit_layer: Option<String>,
    /// Whether create made DIR (then rollback and delete remove it again, if empty).
    #[serde(default)]
    pub made_dir: bool,
    /// Free-form labels from the caller (e.g. the Kubernetes PV/PVC names).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The data-only layers below its generation's metadata base, newest first: pinned and
    /// mounted like `layers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_layers: Vec<String>,
    /// The cache's scope this volume reads on top of the cache and writes back into (never
    /// into the cache itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Write-back `on-success`: commit only if the job left [`SUCCESS_MARKER`] at the root.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_success: bool,
    /// What delete found of the success marker (`None`: not judged yet). Recorded before the
    /// marker is removed, so that a retried delete keeps the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
}

/// The file a job leaves at a volume's root to say it succeeded (write-back `on-success`).
/// Removed before the commit: it never reaches a cache.
pub const SUCCESS_MARKER: &str = ".jobcachefs-success";

/// `caches/<ns>/<name>/scopes/<scope>.json`: a scope's own delta layers, stacked on whatever
/// generation the cache has when a volume is made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopeRecord {
    /// The scope's name (a DNS-1123 label).
    pub scope: String,
    /// Increases by one with each publish (commit or merge).
    pub generation: u64,
    /// Its layers, bottom first (upper format: whiteouts and opaque dirs hide the cache's
    /// entries for this scope only).
    pub layers: Vec<LayerInfo>,
    /// Unix seconds of its first commit.
    pub created: u64,
    /// Unix seconds of the last publish.
    pub published: u64,
    /// The last publishes (at most 20), oldest first.
    #[serde(default)]
    pub history: Vec<ScopeEvent>,
}

/// One publish of a scope, as `cache history NAME --scope S` lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopeEvent {
    /// The scope's generation it made.
    pub generation: u64,
    /// Unix seconds.
    pub published: u64,
    /// `commit` or `merge`.
    pub kind: String,
    /// The volume DIR of a commit; what a merge folded.
    pub source: String,
    /// The scope's layers after it.
    pub layers: usize,
}

impl ScopeRecord {
    /// Allocated bytes of its layers.
    pub fn allocated(&self) -> u64 {
        self.layers.iter().map(|l| l.allocated).sum()
    }

    /// Layer ids, bottom first.
    pub fn layer_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.id.clone()).collect()
    }
}
