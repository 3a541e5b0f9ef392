//! Node-wide counters for the agent's `/metrics`: volumes created on a warm or cold cache,
//! commits, squashes, pushes and pulls with bytes and durations. Every process (hooks, CLI,
//! agent) adds to `<state>/stats.json` under `<state>/stats.lock`; counting is best effort and
//! never fails the operation it counts. It is on the path of every volume create and commit, so
//! it is written without fsync (temp → rename): a crash may lose the last counts, and a file it
//! cannot parse counts as empty.

use crate::error::IoContext;
use crate::state::layout::Layout;
use crate::state::lock;
use std::collections::BTreeMap;

/// Counter names.
pub mod names {
    /// Volumes created on a cache that had a generation.
    pub const VOLUMES_WARM: &str = "volumes_created_warm";
    /// Volumes created on an empty or new cache.
    pub const VOLUMES_COLD: &str = "volumes_created_cold";
    /// Volumes created without a cache.
    pub const VOLUMES_PLAIN: &str = "volumes_created_plain";
    /// Commits published.
    pub const COMMITS: &str = "commits";
    /// Commits published into a scope (not counted in `commits`).
    pub const SCOPE_COMMITS: &str = "scope_commits";
    /// Write-back `on-success` deletes whose job left no success marker: discarded.
    pub const COMMITS_DECLINED: &str = "commits_declined";
    /// Generations a clone commit superseded without having started from them
    /// (`clone_writers = "last-writer-wins"`): their changes are not in the cache.
    pub const CLONE_SUPERSEDED: &str = "clone_generations_superseded";
    /// Squashes published.
    pub const SQUASHES: &str = "squashes";
    /// Pushes that changed the registry.
    pub const PUSHES: &str = "pushes";
    /// Compressed bytes of layers new to the registry.
    pub const PUSH_BYTES: &str = "push_bytes";
    /// Milliseconds spent pushing.
    pub const PUSH_MS: &str = "push_milliseconds";
    /// Failed pushes.
    pub const PUSH_FAILURES: &str = "push_failures";
    /// Pulls that changed a cache.
    pub const PULLS: &str = "pulls";
    /// Compressed bytes downloaded.
    pub const PULL_BYTES: &str = "pull_bytes";
    /// Milliseconds spent pulling.
    pub const PULL_MS: &str = "pull_milliseconds";
    /// Failed pulls.
    pub const PULL_FAILURES: &str = "pull_failures";
    /// CSI NodePublishVolume calls that failed.
    pub const CSI_PUBLISH_FAILURES: &str = "csi_publish_failures";
    /// CSI NodeUnpublishVolume calls that failed.
    pub const CSI_UNPUBLISH_FAILURES: &str = "csi_unpublish_failures";
    /// Write-back deletes whose commit did not fit the cache-size even squashed.
    pub const COMMITS_REJECTED: &str = "commits_rejected";
    /// Write-back deletes whose changes could not be committed (an image not cleanly unmounted
    /// after a crash, a clone volume without the write lease).
    pub const COMMITS_NOT_COMMITTED: &str = "commits_not_committed";
    /// Volume creates refused by disk admission.
    pub const ADMISSION_REFUSALS: &str = "admission_refusals";
}

/// The key of the latest time (unix seconds, kept as a maximum by [`update`]) at which an
/// import or an export of cache `id` reached its registry and finished.
pub fn sync_ok_key(id: &crate::input::names::CacheId) -> String {
    format!("sync_ok_at:{}/{}", id.namespace, id.name)
}

/// Latency histograms: their names (each kept as bucket counters in the same file).
pub mod histograms {
    /// Seconds a successful CSI NodePublishVolume took.
    pub const CSI_PUBLISH: &str = "csi_publish_seconds";
    /// Seconds a successful CSI NodeUnpublishVolume (the delete: commit or discard) took.
    pub const CSI_UNPUBLISH: &str = "csi_unpublish_seconds";
    /// Seconds a successful volume create took (any front end: CLI, hook, CSI).
    pub const VOLUME_CREATE: &str = "volume_create_seconds";
    /// Seconds a volume delete that published a commit took (a squash to fit included).
    pub const VOLUME_COMMIT: &str = "volume_commit_seconds";
    /// Seconds any other successful volume delete took (discarded, unchanged, rejected).
    pub const VOLUME_DISCARD: &str = "volume_discard_seconds";
    /// Seconds a published squash took.
    pub const SQUASH: &str = "squash_seconds";
    /// Seconds an import (pull) that changed a cache took.
    pub const IMPORT: &str = "import_seconds";
    /// Seconds an export (push) that changed the registry took.
    pub const EXPORT: &str = "export_seconds";
    /// Every histogram, for `/metrics`.
    pub const ALL: [(&str, &str); 8] = [
        (VOLUME_CREATE, "Time a successful volume create took (CLI, hook or CSI)."),
        (
            VOLUME_COMMIT,
            "Time a volume delete that published a commit took (with the squash an over-size commit needs).",
        ),
        (
            VOLUME_DISCARD,
            "Time any other successful volume delete took (discarded, unchanged or rejected).",
        ),
        (SQUASH, "Time a published squash took (queued, over-size commit or resize)."),
        (IMPORT, "Time an import (pull) that changed a cache took."),
        (EXPORT, "Time an export (push) that changed the registry took."),
        (CSI_PUBLISH, "Time a successful CSI NodePublishVolume took (the volume's create)."),
        (
            CSI_UNPUBLISH,
            "Time a successful CSI NodeUnpublishVolume took (the volume's delete: commit or discard).",
        ),
    ];
}

/// Upper bounds (seconds) of the histogram buckets: from the ~15 ms of a warm create to the
/// minutes of a commit that must squash first; `+Inf` is implied.
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The counters of one observation of `seconds` in histogram `name`: its bucket (the first
/// whose bound holds it, or `inf`), the count and the sum in microseconds.
pub fn observation(name: &str, seconds: f64) -> [(String, u64); 3] {
    let bucket = BUCKETS
        .iter()
        .position(|b| seconds <= *b)
        .map(|i| i.to_string())
        .unwrap_or_else(|| "inf".into());
    [
        (format!("{name}_bucket_{bucket}"), 1),
        (format!("{name}_count"), 1),
        (format!("{name}_sum_us"), (seconds * 1e6).round() as u64),
    ]
}

/// Records that histogram `name` observed `elapsed`, plus `deltas`, in one update.
pub fn observe(layout: &Layout, name: &str, elapsed: std::time::Duration, deltas: &[(&str, u64)]) {
    let obs = observation(name, elapsed.as_secs_f64());
    let mut all: Vec<(&str, u64)> = obs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    all.extend_from_slice(deltas);
    add(layout, &all);
}

/// Histogram `name` from `counters`: cumulative bucket counts per bound (`+Inf` last), the
/// count and the sum in seconds, as Prometheus exposes them.
pub fn histogram(counters: &BTreeMap<String, u64>, name: &str) -> (Vec<(String, u64)>, u64, f64) {
    let get = |k: String| counters.get(&k).copied().unwrap_or(0);
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
    for (i, b) in BUCKETS.iter().enumerate() {
        cumulative += get(format!("{name}_bucket_{i}"));
        buckets.push((b.to_string(), cumulative));
    }
    cumulative += get(format!("{name}_bucket_inf"));
    buckets.push(("+Inf".into(), cumulative));
    let count = get(format!("{name}_count"));
    let sum = get(format!("{name}_sum_us")) as f64 / 1e6;
    (buckets, count, sum)
}

/// Adds `deltas` to the node's counters.
pub fn add(layout: &Layout, deltas: &[(&str, u64)]) {
    update(layout, deltas, &[]);
}

/// Adds `deltas` and raises each of `latest` to at least its value, in one update. A maximum,
/// not a plain set: two processes finishing out of order never move a timestamp backwards.
pub fn update(layout: &Layout, deltas: &[(&str, u64)], latest: &[(&str, u64)]) {
    let result = (|| -> crate::Result<()> {
        let _l = lock::lock(&layout.root().join("stats.lock"))?;
        let path = layout.root().join("stats.json");
        let mut c = read(layout);
        for (k, v) in deltas {
            *c.entry(k.to_string()).or_default() += v;
        }
        for (k, v) in latest {
            let e = c.entry(k.to_string()).or_default();
            *e = (*e).max(*v);
        }
        let tmp = layout.root().join(".stats.json.tmp");
        let body = serde_json::to_vec_pretty(&c).expect("counters serialise");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .at("write", &path)
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not update the node's counters");
    }
}

/// The node's counters (empty when the file is missing or unreadable).
pub fn read(layout: &Layout) -> BTreeMap<String, u64> {
    std::fs::read(layout.root().join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let mut c = BTreeMap::new();
        for secs in [0.001, 0.005, 0.012, 0.3, 400.0] {
            for (k, v) in observation("h", secs) {
                *c.entry(k).or_default() += v;
            }
        }
        let (buckets, count, sum) = histogram(&c, "h");
        assert_eq!(count, 5);
        assert!((sum - 400.318).abs() < 1e-6, "{sum}");
        let at = |le: &str| buckets.iter().find(|(b, _)| b == le).unwrap().1;
        assert_eq!(at("0.005"), 2); // a bound holds what equals it
        assert_eq!(at("0.025"), 3);
        assert_eq!(at("0.5"), 4);
        assert_eq!(at("120"), 4);
        assert_eq!(at("+Inf"), 5);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
