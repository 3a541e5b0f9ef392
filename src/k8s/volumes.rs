//! What both Kubernetes front ends (the provisioner hook and the CSI plugin) do around the
//! engine once [`super::policy`] has decided: before a create, pull a cold cache within the
//! front end's deadline and get the cache's cluster-wide GID; after a delete, the cheap repair
//! of what crashed runs left in the state dir.

use super::client::Client;
use super::policy::Decision;
use crate::error::Result;
use crate::state::records::{RootOwner, VolumeRecord};
use crate::Engine;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Creates the volume `decision` describes at `dir`. `api` is called only when the decision
/// needs the cluster (a cache GID for unique ids).
pub fn create(
    engine: &Engine,
    decision: &Decision,
    dir: PathBuf,
    root: Option<RootOwner>,
    labels: BTreeMap<String, String>,
    deadline: Instant,
    api: impl FnOnce() -> Result<Client>,
) -> Result<VolumeRecord> {
    if let Some(id) = &decision.cache {
        crate::sync::ops::pull_if_cold(engine, id, Some(deadline));
    }
    // A cache's GID is the cluster's: allocated once through the API, the same on every node.
    let cache_gid = match (&decision.cache, decision.unique_ids) {
        (Some(id), true) => Some(super::gids::cache_gid(
            &api()?,
            id,
            engine.config().cache_gids,
        )?),
        _ => None,
    };
    engine.volume_create(&decision.request(dir, root, labels, cache_gid))
}

/// After a delete: repairs what crashed runs left in the state dir. Never fails the delete,
/// whose own work is done; squashes stay queued for the node agent (`squash_inline = false`).
pub fn repair_after_delete(engine: &Engine, what: &str) {
    match engine.gc_shared() {
        Ok(report) if !report.errors.is_empty() => {
            tracing::warn!(errors = ?report.errors, "gc after {what} found problems")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "gc after {what} failed"),
    }
}

/// A client of the API as the front ends find it (`KUBECONFIG`, the pod's service account, or
/// `~/.kube/config`), with the configured time budget.
pub fn client(config: &crate::input::config::Config) -> Result<Client> {
    let budget = std::time::Duration::from_secs(config.kubernetes.api_timeout);
    Client::new(super::kubeconfig::discover()?, budget)
}
