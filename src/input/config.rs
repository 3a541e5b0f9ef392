//! The node configuration (`/etc/jobcachefs/config.toml`, env `JOBCACHEFS_CONFIG`): defaults for
//! sizes, squash depth and thresholds. Every key is optional; `config/jobcachefs.example.toml`
//! documents each one.

use crate::error::{Error, Result};
use crate::input::quantity::parse_size;
use serde::Deserialize;
use std::path::Path;

/// Default config file location.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/jobcachefs/config.toml";

/// The file as written: sizes are quantity strings, checked in [`Config::from_toml`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    default_cache_size: Option<String>,
    default_volume_size: Option<String>,
    max_volume_size: Option<String>,
    max_depth: Option<usize>,
    max_depth_hard: Option<usize>,
    squash_delta_size: Option<String>,
    squash_inline: Option<bool>,
    squash_method: Option<String>,
    metadata_squash_depth: Option<usize>,
    squash_idle_seconds: Option<u64>,
    scope_size: Option<String>,
    scope_idle: Option<String>,
    node_budget: Option<String>,
    disk_reserve: Option<String>,
    overcommit: Option<f64>,
    keep_generations: Option<usize>,
    volume_uids: Option<String>,
    cache_gids: Option<String>,
    layer_keep_seconds: Option<u64>,
    clone_writers: Option<String>,
    clone_backend: Option<String>,
    clone_pool_size: Option<String>,
    clone_max_extents: Option<usize>,
    kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    registry: Vec<RawRegistry>,
    agent: Option<RawAgent>,
    csi: Option<RawCsi>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsi {
    inline_write_back: Option<Vec<String>>,
    inline_scope_write_back: Option<Vec<String>>,
    inline_default_size: Option<String>,
    inline_max_size: Option<String>,
    publish_deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    caches: Option<String>,
    image: String,
    tls_verify: Option<bool>,
    allow_devices: Option<bool>,
    pull_on_create: Option<bool>,
    timeout: Option<String>,
    direct_blobs: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interval: Option<String>,
    metrics_addr: Option<String>,
    prefetch: Option<Vec<String>>,
    orphan_after: Option<String>,
}

/// Where the caches matching a prefix live in a registry (`[[registry]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Prefix of `<namespace>/<name>` this applies to (`""`: every cache). The longest match wins.
    pub caches: String,
    /// Repository prefix: a cache's image is `<image>/<namespace>/<name>`.
    pub image: String,
    /// Verify TLS.
    pub tls_verify: bool,
    /// Accept device nodes in imported layers.
    pub allow_devices: bool,
    /// `volume create` on a cold cache pulls it first (blocking).
    pub pull_on_create: bool,
    /// Longest one registry operation may take, in seconds.
    pub timeout: u64,
    /// Move layer blobs over the registry's HTTP API directly when nothing in the containers
    /// configuration applies to it (see `sync::registry`); false: always through skopeo.
    pub direct_blobs: bool,
}

/// The node agent (`[agent]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Seconds between sync rounds.
    pub interval: u64,
    /// Address of the Prometheus endpoint.
    pub metrics_addr: String,
    /// Caches (`<namespace>/<name>`) to pull even before this node used them.
    pub prefetch: Vec<String>,
    /// Seconds a hook volume must exist before the agent may discard it because the API no
    /// longer has its PV (the provisioner creates the PV only after the setup succeeded).
    pub orphan_after: u64,
}

/// The CSI plugin (`[csi]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiConfig {
    /// Who may write back through inline ephemeral volumes: `NS` (every service account of the
    /// namespace) or `NS/SERVICEACCOUNT`, as kubelet reports them (the pod's author cannot forge
    /// either). Checked to be DNS labels.
    pub inline_write_back: Vec<String>,
    /// Who may write back into a scope through an inline volume with a `scope` attribute: the
    /// same forms, or `*` for everyone (the default: a scope cannot reach the cache).
    pub inline_scope_write_back: Vec<String>,
    /// Size of an inline volume that names none.
    pub inline_default_size: u64,
    /// The largest `size` an inline volume may ask for.
    pub inline_max_size: u64,
    /// Seconds from the start of a publish by which a pull of a cold cache must have given up
    /// (kubelet gives a NodePublishVolume 2 minutes, then retries).
    pub publish_deadline: u64,
}

impl Default for CsiConfig {
    fn default() -> Self {
        CsiConfig {
            inline_write_back: Vec::new(),
            inline_scope_write_back: vec!["*".to_string()],
            inline_default_size: 2 << 30,
            inline_max_size: 20 << 30,
            publish_deadline: 90,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interval: 30,
            metrics_addr: "127.0.0.1:9477".into(),
            prefetch: Vec::new(),
            orphan_after: 600,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    node_paths: Option<Vec<std::path::PathBuf>>,
    api_timeout: Option<String>,
    setup_deadline: Option<String>,
}

/// Settings of the Kubernetes hook (`[kubernetes]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The provisioner's node paths (its `config.json` `nodePathMap` paths); needed to read the
    /// PVC from folders made by a `pathPattern`.
    pub node_paths: Vec<std::path::PathBuf>,
    /// Time one API read may take, retries included, in seconds.
    pub api_timeout: u64,
    /// Seconds from the start of a setup by which a `pull_on_create` pull must have given up,
    /// so that the setup ends inside the provisioner's `cmdTimeoutSeconds` (120 by default,
    /// counted from when it created the helper pod).
    pub setup_deadline: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            node_paths: Vec::new(),
            api_timeout: 20,
            // 120 s of cmdTimeoutSeconds less the helper pod's start and the volume's creation.
            setup_deadline: 90,
        }
    }
}

/// Who may commit into a clone cache when several write-back volumes of it live at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneWriters {
    /// The first write-back volume holds the cache's write lease and commits; volumes created
    /// while it is held run as discard volumes, and say so at create and delete.
    Lease,
    /// Every write-back volume commits; the last one to be deleted wins, and what it
    /// supersedes is logged and counted.
    LastWriterWins,
}

/// Where clone-mode volumes get their copy-on-write clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneBackend {
    /// FICLONE on the state dir if it supports it (XFS with reflink, btrfs), else the pool.
    Auto,
    /// FICLONE on the state dir; refused if it cannot.
    Reflink,
    /// A reflink pool that jobcachefs manages: a sparse XFS image in the state dir.
    Pool,
}

/// How a due squash is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SquashMethod {
    /// A new base holding every file's data: O(bytes).
    #[default]
    Full,
    /// A new base of metadata whose files redirect into the old layers: O(files).
    Metadata,
}

/// Largest `max_depth_hard`: half the layers one overlay may have
/// ([`crate::host::mounts::MAX_OVERLAY_LOWERS`]), the other half left for a scope's layers.
pub const MAX_DEPTH_HARD: usize = 64;

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Size limit of a cache created without an explicit one.
    pub default_cache_size: u64,
    /// Size of a volume created without an explicit one.
    pub default_volume_size: u64,
    /// Largest volume this node creates, whatever is asked.
    pub max_volume_size: u64,
    /// A generation with more layers than this (base included) is squashed.
    pub max_depth: usize,
    /// The hard bound: a create, commit, import or gc that finds a generation deeper than this
    /// merges its newest layers into one delta (down to `max_depth`) first, whatever
    /// `squash_inline` says. Default 4 × `max_depth`; at most 64, so that a scoped volume's
    /// stack stays within the 128 layers jobcachefs mounts.
    pub max_depth_hard: usize,
    /// A generation whose layers above the base allocate more than this is squashed.
    pub squash_delta_size: u64,
    /// How due squashes (queued, idle) are made: `full` (a base holding every file's data) or
    /// `metadata` (a base of metadata over the old layers as data-only layers, where the
    /// kernel and the cache allow it; full elsewhere).
    pub squash_method: SquashMethod,
    /// Under `squash_method = "metadata"`: a generation with more layers than this is
    /// metadata-squashed already (where the cache allows one; else at `max_depth`). A metadata
    /// squash from manifests costs milliseconds, and every layer fewer is a lookup fewer.
    /// Default 4 (or `max_depth` if smaller).
    pub metadata_squash_depth: usize,
    /// Whether `volume delete` runs a due squash itself (true) or leaves it queued for `gc` or
    /// the agent (false, what the Kubernetes hook does to stay inside the provisioner's timeout).
    pub squash_inline: bool,
    /// A cache of more than one layer that no volume was created on for this many seconds is
    /// squashed by `gc --drain` and the agent, whatever its depth: every lookup through a
    /// volume pays for each layer, and an idle cache is squashed when no job waits; 0: never.
    pub squash_idle_seconds: u64,
    /// Limit on the allocated bytes of one scope's layers; `None`: its cache's cache-size.
    pub scope_size: Option<u64>,
    /// A scope no volume was created on for this many seconds is removed by gc, the agent and
    /// prune (default 7 days).
    pub scope_idle_seconds: u64,
    /// Node-wide budget for all caches' allocated bytes; least recently used caches are pruned
    /// after a commit pushes the total over it.
    pub node_budget: Option<u64>,
    /// Free space of the state dir's filesystem that volume creates never promise away, so that
    /// deletes and commits can always finish. `None`: 5% of the filesystem, at most 1 GiB.
    pub disk_reserve: Option<u64>,
    /// How many times the free space (less the reserve) creates may promise, in percent: 100
    /// (the default) never promises a byte twice.
    pub overcommit_percent: u32,
    /// UIDs given to volumes with unique ids, unique among the node's live volumes.
    pub volume_uids: (u32, u32),
    /// GIDs given to caches used with unique ids, unique in the cluster (through the API) or
    /// on the node (without one).
    pub cache_gids: (u32, u32),
    /// How many of the latest generations keep their layers, so that a cache can be rolled
    /// back to them (the current one included).
    pub keep_generations: usize,
    /// Seconds the layer mounts of a cache's current generation stay after their last volume
    /// (counted from the cache's last create), so that a busy cache does not attach and mount
    /// them again at every create; 0 unmounts them with their last volume.
    pub layer_keep_seconds: u64,
    /// Who commits into a clone cache when several write-back volumes of it live at once.
    pub clone_writers: CloneWriters,
    /// Where clone volumes get their clones.
    pub clone_backend: CloneBackend,
    /// Size of the reflink pool when it is first made (a sparse file: only what clones write is
    /// allocated, and admission counts the rest as promised).
    pub clone_pool_size: u64,
    /// A committed clone image with more data extents than this is rebuilt (FICLONE time
    /// grows with the extent count).
    pub clone_max_extents: usize,
    /// Settings of the Kubernetes hook.
    pub kubernetes: KubernetesConfig,
    /// Registries, by cache prefix.
    pub registries: Vec<RegistryConfig>,
    /// The node agent.
    pub agent: AgentConfig,
    /// The CSI plugin.
    pub csi: CsiConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_cache_size: 10 << 30,
            default_volume_size: 2 << 30,
            max_volume_size: 100 << 30,
            // Every cold lookup through a volume pays for each layer: 16,000 small files walked
            // cold through 4 layers took 1.09-1.92x the host dir's time, through 8 layers
            // 1.60-2.03x (bench/run depth, four runs on a shared machine). Deeper stacks wait
            // for a squash; idle ones get one sooner (squash_idle_seconds).
            max_depth: 8,
            max_depth_hard: 32,
            squash_method: SquashMethod::Full,
            metadata_squash_depth: 4,
            squash_delta_size: 4 << 30,
            squash_inline: true,
            squash_idle_seconds: 600,
            scope_size: None,
            scope_idle_seconds: 7 * 86_400,
            node_budget: None,
            disk_reserve: None,
            overcommit_percent: 100,
            keep_generations: 3,
            volume_uids: (2_000_000, 2_999_999),
            cache_gids: (3_000_000, 3_999_999),
            layer_keep_seconds: 600,
            clone_writers: CloneWriters::Lease,
            clone_backend: CloneBackend::Auto,
            clone_pool_size: 64 << 30,
            clone_max_extents: 20_000,
            kubernetes: KubernetesConfig::default(),
            registries: Vec::new(),
            agent: AgentConfig::default(),
            csi: CsiConfig::default(),
        }
    }
}

impl Config {
    /// Parses config text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            Error::invalid(format!(
                "config {origin} is invalid: {e}; see config/jobcachefs.example.toml for every key"
            ))
        })?;
        let d = Config::default();
        let size = |key: &str, v: &Option<String>, default: u64| -> Result<u64> {
            match v {
                Some(s) => parse_size(&format!("{key} in {origin}"), s),
                None => Ok(default),
            }
        };
        let max_depth = raw.max_depth.unwrap_or(d.max_depth);
        if !(2..=MAX_DEPTH_HARD).contains(&max_depth) {
            return Err(Error::invalid(format!(
                "max_depth in {origin} is {max_depth}: use a number from 2 to 64"
            )));
        }
        let max_depth_hard = raw
            .max_depth_hard
            .unwrap_or((4 * max_depth).min(MAX_DEPTH_HARD));
        if !(max_depth..=MAX_DEPTH_HARD).contains(&max_depth_hard) {
            return Err(Error::invalid(format!(
                "max_depth_hard in {origin} is {max_depth_hard}: use a number from max_depth ({max_depth}) to {MAX_DEPTH_HARD}"
            )));
        }
        let metadata_squash_depth = raw
            .metadata_squash_depth
            .unwrap_or(d.metadata_squash_depth.min(max_depth));
        if !(1..=max_depth).contains(&metadata_squash_depth) {
            return Err(Error::invalid(format!(
                "metadata_squash_depth in {origin} is {metadata_squash_depth}: use a number from 1 to max_depth ({max_depth})"
            )));
        }
        Ok(Config {
            default_cache_size: size(
                "default_cache_size",
                &raw.default_cache_size,
                d.default_cache_size,
            )?,
            default_volume_size: size(
                "default_volume_size",
                &raw.default_volume_size,
                d.default_volume_size,
            )?,
            max_volume_size: size("max_volume_size", &raw.max_volume_size, d.max_volume_size)?,
            max_depth,
            max_depth_hard,
            metadata_squash_depth,
            squash_method: match raw.squash_method.as_deref() {
                None | Some("full") => SquashMethod::Full,
                Some("metadata") => SquashMethod::Metadata,
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "squash_method in {origin} is {other:?}: use \"full\" or \"metadata\""
                    )))
                }
            },
            squash_delta_size: size(
                "squash_delta_size",
                &raw.squash_delta_size,
                d.squash_delta_size,
            )?,
            squash_inline: raw.squash_inline.unwrap_or(d.squash_inline),
            squash_idle_seconds: match raw.squash_idle_seconds {
                None => d.squash_idle_seconds,
                Some(n) if n <= 604_800 => n,
                Some(n) => {
                    return Err(Error::invalid(format!(
                        "squash_idle_seconds in {origin} is {n}: use a number of seconds from 0 (never squash for idleness) to 604800"
                    )))
                }
            },
            scope_size: match &raw.scope_size {
                Some(s) => Some(parse_size(&format!("scope_size in {origin}"), s)?),
                None => None,
            },
            scope_idle_seconds: match &raw.scope_idle {
                Some(s) => crate::input::quantity::parse_duration(
                    &format!("scope_idle in {origin}"),
                    s,
                )?,
                None => d.scope_idle_seconds,
            },
            node_budget: match &raw.node_budget {
                Some(s) => Some(parse_size(&format!("node_budget in {origin}"), s)?),
                None => None,
            },
            disk_reserve: match &raw.disk_reserve {
                Some(s) => Some(parse_size(&format!("disk_reserve in {origin}"), s)?),
                None => None,
            },
            overcommit_percent: match raw.overcommit {
                None => d.overcommit_percent,
                Some(f) if f.is_finite() && (1.0..=100.0).contains(&f) => (f * 100.0).round() as u32,
                Some(f) => {
                    return Err(Error::invalid(format!(
                        "overcommit in {origin} is {f}: use a factor from 1.0 (never promise the disk twice, the default) to 100"
                    )))
                }
            },
            volume_uids: match &raw.volume_uids {
                Some(v) => id_range(&format!("volume_uids in {origin}"), v)?,
                None => d.volume_uids,
            },
            cache_gids: match &raw.cache_gids {
                Some(v) => id_range(&format!("cache_gids in {origin}"), v)?,
                None => d.cache_gids,
            },
            keep_generations: match raw.keep_generations {
                None => d.keep_generations,
                Some(n) if (1..=100).contains(&n) => n,
                Some(n) => {
                    return Err(Error::invalid(format!(
                        "keep_generations in {origin} is {n}: use a number from 1 (only the current generation) to 100"
                    )))
                }
            },
            layer_keep_seconds: match raw.layer_keep_seconds {
                None => d.layer_keep_seconds,
                Some(n) if n <= 86_400 => n,
                Some(n) => {
                    return Err(Error::invalid(format!(
                        "layer_keep_seconds in {origin} is {n}: use a number of seconds from 0 (unmount with the last volume) to 86400"
                    )))
                }
            },
            clone_writers: match raw.clone_writers.as_deref() {
                None | Some("lease") => CloneWriters::Lease,
                Some("last-writer-wins") => CloneWriters::LastWriterWins,
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "clone_writers in {origin} is {other:?}: use \"lease\" or \"last-writer-wins\""
                    )))
                }
            },
            clone_backend: match raw.clone_backend.as_deref() {
                None | Some("auto") => CloneBackend::Auto,
                Some("reflink") => CloneBackend::Reflink,
                Some("pool") => CloneBackend::Pool,
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "clone_backend in {origin} is {other:?}: use \"auto\", \"reflink\" or \"pool\""
                    )))
                }
            },
            clone_pool_size: size("clone_pool_size", &raw.clone_pool_size, d.clone_pool_size)?,
            clone_max_extents: raw.clone_max_extents.unwrap_or(d.clone_max_extents),
            kubernetes: kubernetes(raw.kubernetes.unwrap_or_default(), origin)?,
            registries: raw
                .registry
                .into_iter()
                .map(|r| registry(r, origin))
                .collect::<Result<_>>()?,
            agent: agent(raw.agent.unwrap_or_default(), origin)?,
            csi: csi(raw.csi.unwrap_or_default(), origin)?,
        })
    }

    /// Loads `path`; a missing file at the default location means defaults, a missing file that
    /// was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::io(
                format!(
                    "read config {} (set --config or JOBCACHEFS_CONFIG to an existing file)",
                    path.display()
                ),
                e,
            )),
        }
    }
}

impl Config {
    /// The registry settings for cache `id` (the longest matching prefix), if any.
    pub fn registry_for(&self, id: &crate::input::names::CacheId) -> Option<&RegistryConfig> {
        let key = format!("{}/{}", id.namespace, id.name);
        self.registries
            .iter()
            .filter(|r| key.starts_with(&r.caches))
            .max_by_key(|r| r.caches.len())
    }
}

/// Parses an id range `FIRST-LAST` (inclusive), above the system's ids and below 2^31.
fn id_range(what: &str, v: &str) -> Result<(u32, u32)> {
    let bad = || {
        Error::invalid(format!(
            "{what} is {v:?}: use FIRST-LAST with 1000 <= FIRST <= LAST < 2147483648, e.g. \"2000000-2999999\" (ranges of different nodes' volumes may overlap; keep them clear of real users)"
        ))
    };
    let (a, b) = v.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1000 || a > b || b >= 1 << 31 {
        return Err(bad());
    }
    Ok((a, b))
}

fn registry(raw: RawRegistry, origin: &str) -> Result<RegistryConfig> {
    let timeout = match raw.timeout {
        Some(s) => {
            crate::input::quantity::parse_duration(&format!("registry.timeout in {origin}"), &s)?
        }
        None => 300,
    };
    if raw.image.trim().is_empty() {
        return Err(Error::invalid(format!(
            "a [[registry]] in {origin} has an empty image: give a repository prefix such as registry.example.com/jobcachefs"
        )));
    }
    Ok(RegistryConfig {
        caches: raw.caches.unwrap_or_default(),
        image: raw.image.trim_end_matches('/').to_string(),
        tls_verify: raw.tls_verify.unwrap_or(true),
        allow_devices: raw.allow_devices.unwrap_or(false),
        pull_on_create: raw.pull_on_create.unwrap_or(false),
        timeout,
        direct_blobs: raw.direct_blobs.unwrap_or(true),
    })
}

fn agent(raw: RawAgent, origin: &str) -> Result<AgentConfig> {
    let d = AgentConfig::default();
    Ok(AgentConfig {
        interval: match raw.interval {
            Some(s) => {
                crate::input::quantity::parse_duration(&format!("agent.interval in {origin}"), &s)?
            }
            None => d.interval,
        },
        metrics_addr: raw.metrics_addr.unwrap_or(d.metrics_addr),
        prefetch: raw.prefetch.unwrap_or_default(),
        orphan_after: match raw.orphan_after {
            Some(s) => crate::input::quantity::parse_duration(
                &format!("agent.orphan_after in {origin}"),
                &s,
            )?,
            None => d.orphan_after,
        },
    })
}

fn csi(raw: RawCsi, origin: &str) -> Result<CsiConfig> {
    let d = CsiConfig::default();
    let inline_write_back = raw.inline_write_back.unwrap_or_default();
    let inline_scope_write_back = raw
        .inline_scope_write_back
        .unwrap_or(d.inline_scope_write_back.clone());
    for entry in inline_write_back
        .iter()
        .chain(inline_scope_write_back.iter().filter(|e| e.as_str() != "*"))
    {
        let mut parts = entry.splitn(2, '/');
        let ns = parts.next().unwrap_or_default();
        let sa = parts.next();
        let ok = crate::input::names::validate_label("namespace", ns).is_ok()
            && sa.is_none_or(|sa| {
                crate::input::names::validate_subdomain("service account", sa).is_ok()
            });
        if !ok {
            return Err(Error::invalid(format!(
                "csi.inline_write_back in {origin} has {entry:?}: give \"NAMESPACE\" or \"NAMESPACE/SERVICEACCOUNT\" (Kubernetes names, lower case)"
            )));
        }
    }
    let size = |key: &str, v: &Option<String>, default: u64| -> Result<u64> {
        match v {
            Some(s) => parse_size(&format!("csi.{key} in {origin}"), s),
            None => Ok(default),
        }
    };
    let inline_default_size = size(
        "inline_default_size",
        &raw.inline_default_size,
        d.inline_default_size,
    )?;
    let inline_max_size = size("inline_max_size", &raw.inline_max_size, d.inline_max_size)?;
    if inline_default_size > inline_max_size {
        return Err(Error::invalid(format!(
            "csi.inline_default_size in {origin} ({inline_default_size} bytes) is above csi.inline_max_size ({inline_max_size} bytes): lower the one or raise the other"
        )));
    }
    let publish_deadline = match raw.publish_deadline {
        Some(s) => crate::input::quantity::parse_duration(
            &format!("csi.publish_deadline in {origin}"),
            &s,
        )?,
        None => d.publish_deadline,
    };
    Ok(CsiConfig {
        inline_write_back,
        inline_scope_write_back,
        inline_default_size,
        inline_max_size,
        publish_deadline,
    })
}

fn kubernetes(raw: RawKubernetes, origin: &str) -> Result<KubernetesConfig> {
    let d = KubernetesConfig::default();
    let node_paths = raw.node_paths.unwrap_or_default();
    if let Some(p) = node_paths
        .iter()
        .find(|p| !p.is_absolute() || p.parent().is_none())
    {
        return Err(Error::invalid(format!(
            "kubernetes.node_paths in {origin} has {:?}: give the provisioner's absolute node paths (not /)",
            p.display().to_string()
        )));
    }
    let api_timeout = match raw.api_timeout {
        Some(s) => crate::input::quantity::parse_duration(
            &format!("kubernetes.api_timeout in {origin}"),
            &s,
        )?,
        None => d.api_timeout,
    };
    if !(1..=110).contains(&api_timeout) {
        return Err(Error::invalid(format!(
            "kubernetes.api_timeout in {origin} is {api_timeout}s: use 1s to 110s (the provisioner gives a setup 120 s)"
        )));
    }
    let setup_deadline = match raw.setup_deadline {
        Some(s) => crate::input::quantity::parse_duration(
            &format!("kubernetes.setup_deadline in {origin}"),
            &s,
        )?,
        None => d.setup_deadline,
    };
    if !(1..=3600).contains(&setup_deadline) {
        return Err(Error::invalid(format!(
            "kubernetes.setup_deadline in {origin} is {setup_deadline}s: use 1s to 3600s, and keep it below the provisioner's cmdTimeoutSeconds (config.json) less the helper pod's start-up"
        )));
    }
    Ok(KubernetesConfig {
        node_paths,
        api_timeout,
        setup_deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_defaults() {
        assert_eq!(Config::from_toml("", "t").unwrap(), Config::default());
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/jobcachefs.example.toml");
        let c = Config::from_toml(text, "example").unwrap();
        assert_eq!(c, Config::default(), "the example shows the defaults");
    }

    #[test]
    fn bad_values_name_key_and_file() {
        let e = Config::from_toml("default_cache_size = \"10Xi\"", "/etc/x.toml").unwrap_err();
        assert!(
            e.to_string().contains("default_cache_size in /etc/x.toml"),
            "{e}"
        );
        assert_eq!(Config::from_toml("", "f").unwrap().metadata_squash_depth, 4);
        assert_eq!(
            Config::from_toml("max_depth = 3", "f")
                .unwrap()
                .metadata_squash_depth,
            3
        );
        let e = Config::from_toml("max_depth = 8\nmetadata_squash_depth = 9", "f").unwrap_err();
        assert!(
            e.to_string()
                .contains("metadata_squash_depth in f is 9: use a number from 1 to max_depth (8)"),
            "{e}"
        );
        let e = Config::from_toml("max_depth = 1", "f").unwrap_err();
        assert!(e.to_string().contains("max_depth"), "{e}");
        assert_eq!(
            Config::from_toml("max_depth = 8", "f")
                .unwrap()
                .max_depth_hard,
            32
        );
        assert_eq!(
            Config::from_toml("max_depth = 64", "f")
                .unwrap()
                .max_depth_hard,
            64
        );
        let e = Config::from_toml("max_depth = 8\nmax_depth_hard = 7", "f").unwrap_err();
        assert!(
            e.to_string()
                .contains("max_depth_hard in f is 7: use a number from max_depth (8) to 64"),
            "{e}"
        );
        assert!(Config::from_toml("max_depth_hard = 65", "f").is_err());
        assert_eq!(
            Config::from_toml("scope_idle = \"2d\"", "f")
                .unwrap()
                .scope_idle_seconds,
            172_800
        );
        assert_eq!(
            Config::default().csi.inline_scope_write_back,
            vec!["*".to_string()]
        );
        let e =
            Config::from_toml("[csi]\ninline_scope_write_back = [\"Bad_NS\"]", "f").unwrap_err();
        assert!(e.to_string().contains("Bad_NS"), "{e}");
        let e = Config::from_toml("[kubernetes]\nsetup_deadline = \"0s\"", "f").unwrap_err();
        assert!(e.to_string().contains("kubernetes.setup_deadline"), "{e}");
        let c = Config::from_toml("[kubernetes]\nsetup_deadline = \"45s\"", "f").unwrap();
        assert_eq!(c.kubernetes.setup_deadline, 45);
        let e = Config::from_toml("nope = 1", "f").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Modest case counts; nothing written into the source tree on failure.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    const ORIGIN: &str = "/etc/CFGFILE.toml";

    const KEYS: &[&str] = &[
        "default_cache_size",
        "default_volume_size",
        "max_volume_size",
        "max_depth",
        "max_depth_hard",
        "squash_delta_size",
        "squash_inline",
        "squash_method",
        "metadata_squash_depth",
        "squash_idle_seconds",
        "scope_size",
        "scope_idle",
        "inline_scope_write_back",
        "node_budget",
        "disk_reserve",
        "overcommit",
        "keep_generations",
        "clone_writers",
        "clone_backend",
        "clone_pool_size",
        "node_paths",
        "api_timeout",
        "setup_deadline",
        "caches",
        "image",
        "tls_verify",
        "allow_devices",
        "pull_on_create",
        "timeout",
        "direct_blobs",
        "interval",
        "metrics_addr",
        "prefetch",
        "orphan_after",
        "nope",
    ];

    /// TOML values of every type, in forms the keys take and forms they do not.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "\"(1Gi|0|10Xi|1.5Gi|14d|0s|45s|lease|pool|auto|/srv/a|/|rel|)\"",
            "\"[a-zA-Z0-9./ -]{0,10}\"",
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("nan".to_string()),
            Just("inf".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("[\"/srv/a\", \"x\"]".to_string()),
            Just("{}".to_string()),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => "(\\[kubernetes\\]|\\[agent\\]|\\[\\[registry\\]\\]|\\[x\\])",
            1 => "[a-z_=\"\\[\\]{}.0-9 #-]{0,30}",
        ]
    }

    fn tomlish() -> impl Strategy<Value = String> {
        prop_oneof![
            5 => prop::collection::vec(line(), 0..10).prop_map(|l| l.join("\n")),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Any text: a config or an InvalidInput error naming the file, never a panic.
        #[test]
        fn any_text_parses_or_is_refused_naming_the_file(text in tomlish()) {
            match Config::from_toml(&text, ORIGIN) {
                Ok(c) => {
                    prop_assert!((2..=64).contains(&c.max_depth));
                    prop_assert!(c.max_depth <= c.max_depth_hard && c.max_depth_hard <= MAX_DEPTH_HARD);
                    prop_assert!((100..=10_000).contains(&c.overcommit_percent));
                }
                Err(e) => {
                    prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
                    prop_assert!(e.to_string().contains(ORIGIN), "{e}");
                }
            }
        }
    }
}
