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
}

/// Adds `deltas` to the node's counters.
pub fn add(layout: &Layout, deltas: &[(&str, u64)]) {
    let result = (|| -> crate::Result<()> {
        let _l = lock::lock(&layout.root().join("stats.lock"))?;
        let path = layout.root().join("stats.json");
        let mut c = read(layout);
        for (k, v) in deltas {
            *c.entry(k.to_string()).or_default() += v;
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
